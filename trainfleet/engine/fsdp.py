"""Fully sharded data parallel (torch's FSDP2): parameters, gradients and optimizer state split over ranks.

The blocks a wrap policy picks are sharded on their own, innermost first, and then the
root: each block's parameters are all-gathered just before its forward and backward and
freed after (``reshard_after_forward``), so a rank holds only its shard plus one block.
``sharding="hybrid"`` shards inside groups of ``shard_size`` ranks (a node by default) and
replicates across groups, on a 2-D DeviceMesh (HSDP).

Precision goes through FSDP2's own ``MixedPrecisionPolicy``: the sharded parameters stay
fp32 and act as master weights, the all-gathered copies the blocks compute with are bf16
or fp16, and gradients are reduced in fp32 (torchtitan's recipe). fp16 keeps a GradScaler,
whose inf/NaN check DTensor agrees across ranks.
"""
from __future__ import annotations

import collections
import contextlib
import sys
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch

from trainfleet.engine.checkpoint.training_state import check_optimizer_names
from trainfleet.engine.ddp import DDPStrategy
from trainfleet.engine.options import check_strategy_options, mesh_shape
from trainfleet.engine.precision import AutocastPrecision, HalfModelPrecision, Precision
from trainfleet.utils.errors import UsageError

AUTO_WRAP_MIN_PARAMS = 1_000_000
WrapSpec = Any  # "auto" | "none" | "Block,Other" | int | [classes or names] | callable(module) -> bool


class FSDPMixedPrecision(AutocastPrecision):
    """Low-precision compute on fp32 sharded parameters, through FSDP2's MixedPrecisionPolicy.

    No autocast: the blocks receive bf16/fp16 parameters from the all-gather, inputs are
    cast on the way in and the root's output is cast back to fp32, and gradients are
    reduce-scattered in fp32 into the fp32 shards the optimizer steps.
    """

    def forward_context(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def policy(self, root: bool) -> Any:
        """The MixedPrecisionPolicy of a block (``root``: its output comes back as fp32)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32,
                                    output_dtype=torch.float32 if root else None)


def fsdp_precision(precision: Precision) -> Precision:
    """The precision to use under FSDP.

    ``bf16-mixed`` and ``16-mixed``/``O1``/``O2`` become FSDP2's mixed-precision policy (O2's
    design, fp32 masters with fp16 compute, is what FSDP2 does natively); ``32`` and ``O3``
    (a pure fp16 model, sharded as fp16) stay as they are.

    Raises:
        UsageError: Apex's amp, which cannot see FSDP's sharded parameters.
    """
    if precision.name.startswith("apex-"):
        raise UsageError(f"--amp-backend apex ({precision.name}) does not work with --strategy fsdp.",
                         "use the native backend: fsdp runs bf16/fp16 through FSDP2's MixedPrecisionPolicy.")
    if isinstance(precision, AutocastPrecision) and not isinstance(precision, FSDPMixedPrecision):
        return FSDPMixedPrecision(precision.dtype, precision.name)
    if isinstance(precision, HalfModelPrecision) and precision.master_weights:
        return FSDPMixedPrecision(torch.float16, precision.name)
    return precision


def _normalise_wrap(wrap: WrapSpec) -> WrapSpec:
    """``None`` (no blocks), a parameter count, a list of classes/names, or a callable."""
    if isinstance(wrap, bool):
        raise UsageError(f"wrap={wrap!r}: expected 'auto', 'none', class names, a parameter count or a callable.")
    if isinstance(wrap, str):
        text = wrap.strip()
        if text.lower() in ("none", ""):
            return None
        if text.lower() == "auto":
            return AUTO_WRAP_MIN_PARAMS
        try:
            return int(float(text))
        except ValueError:
            return [name.strip() for name in text.split(",") if name.strip()]
    if isinstance(wrap, type):
        return [wrap]
    if wrap is None or isinstance(wrap, (int, float, Sequence)) or callable(wrap):
        return wrap
    raise UsageError(f"wrap={wrap!r}: expected 'auto', 'none', class names, a parameter count or a callable.")


def _predicate(spec: WrapSpec, wrap: WrapSpec) -> Callable[[torch.nn.Module, int], bool]:
    """``predicate(module, parameters not yet in a block below it)`` for a normalised spec."""
    if isinstance(spec, (int, float)):
        if spec < 1:
            raise UsageError(f"wrap={wrap}: a parameter count must be at least 1.")
        return lambda _module, count: count >= spec
    if isinstance(spec, Sequence):
        names = {w for w in spec if isinstance(w, str)}
        classes = tuple(w for w in spec if isinstance(w, type))
        return lambda module, _count: isinstance(module, classes) or type(module).__name__ in names
    return lambda module, _count: bool(spec(module))


def select_blocks(root: torch.nn.Module, wrap: WrapSpec) -> list[torch.nn.Module]:
    """Submodules to shard on their own, innermost first (the root is always sharded last).

    A parameter count (``wrap=1_000_000``, and ``"auto"``) picks the smallest submodules that
    hold at least that many parameters not already inside a picked block, as FSDP1's
    size-based policy did.

    Raises:
        UsageError: class names that match no submodule (the message lists the classes there are).
    """
    spec = _normalise_wrap(wrap)
    if spec is None:
        return []
    predicate = _predicate(spec, wrap)
    chosen: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module) -> int:
        remaining = sum(p.numel() for p in module.parameters(recurse=False))
        remaining += sum(visit(child) for child in module.children())
        if module is not root and predicate(module, remaining):
            chosen.append(module)
            return 0
        return remaining

    visit(root)
    if not chosen and isinstance(spec, Sequence):
        classes = sorted({type(m).__name__ for m in root.modules() if m is not root})
        raise UsageError(f"wrap={wrap!r} matches no submodule of {type(root).__name__}.",
                         f"its submodule classes are {classes}.")
    return chosen


class FSDPStrategy(DDPStrategy):
    """Shards parameters, gradients and optimizer state over the ranks with FSDP2.

    Args:
        wrap: which submodules are sharded as blocks of their own: ``"auto"`` (submodules
            holding at least 1M parameters), ``"none"`` (the root only), class names
            (``"TransformerBlock"``, or a list of classes), a parameter count, or a callable
            ``module -> bool``.
        reshard_after_forward: free the gathered parameters after each block's forward
            (less memory; one more all-gather in backward).
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory
            (for CUDA runs; pinned there).
        activation_checkpointing: recompute each wrapped block's activations in backward.
        sharding: ``"full"`` (one shard per rank) or ``"hybrid"`` (shard within groups of
            ``shard_size`` ranks, replicate across them).
        shard_size: ranks per shard group under hybrid; the node's worker count by default.
        sync_batchnorm: BatchNorm statistics over the global batch (see ``DDPStrategy``).
        timeout_s: collective timeout, as for ddp.

    Raises:
        UsageError: an option of another strategy (``find_unused_parameters``), or a layout
            the mesh cannot divide.
    """

    name = "fsdp"
    broadcasts_weights = True  # rank 0's weights, as under ddp: a script may load pretrained ones there only
    shards_checkpoints = True

    def __init__(self, precision: Any = None, env: Any = None, accelerator: str | None = None,
                 timeout_s: float | None = None, wrap: WrapSpec = "auto", reshard_after_forward: bool = True,
                 cpu_offload: bool = False, activation_checkpointing: bool = False, sharding: str = "full",
                 shard_size: int | None = None, sync_batchnorm: bool = False, **others: Any):
        check_strategy_options("fsdp", others)
        super().__init__(precision, env, accelerator, timeout_s, sync_batchnorm=sync_batchnorm)
        self.precision = fsdp_precision(self.precision)
        self.wrap, self.reshard_after_forward = wrap, bool(reshard_after_forward)
        self.cpu_offload, self.activation_checkpointing = bool(cpu_offload), bool(activation_checkpointing)
        self.sharding, self.shard_size = sharding, shard_size
        self.mesh_shape = mesh_shape(self.world_size, sharding, shard_size, self.env.local_world_size)
        self._mesh: Any = None
        self._replaced: dict[int, tuple[torch.nn.Module, str]] = {}
        self.blocks = 0  # how many submodules the wrap policy sharded on their own
        self.joining = False  # set by the engine on a rank that joins a running job in place

    @property
    def device_mesh(self) -> Any:
        """The DeviceMesh the parameters are sharded over (created on first use)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self.setup_environment()
            names = ("shard",) if len(self.mesh_shape) == 1 else ("replicate", "shard")
            self._mesh = init_device_mesh(self.root_device.type, self.mesh_shape, mesh_dim_names=names)
        return self._mesh

    def _shard_kwargs(self, root: bool) -> dict[str, Any]:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

        kwargs: dict[str, Any] = {
            "mesh": self.device_mesh,
            "reshard_after_forward": self.reshard_after_forward,
            # Pinned host memory needs a CUDA driver; on a CPU run the shards stay pageable.
            "offload_policy": CPUOffloadPolicy(pin_memory=self.root_device.type == "cuda")
            if self.cpu_offload else OffloadPolicy(),
        }
        if isinstance(self.precision, FSDPMixedPrecision):
            kwargs["mp_policy"] = self.precision.policy(root)
        return kwargs

    def _setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        # fully_shard replaces every parameter with a DTensor one; remember the old ones by name so
        # an optimizer built on them (the usual script order) can be moved over in setup_optimizer.
        module = self._convert_batchnorm(module)  # before sharding: it keeps the parameter objects
        if not self.joining:  # a rank joining in place gets the whole state from its peers (Engine._agree_shards)
            self._sync_from_rank0(module)
        self._replaced.update({id(p): (module, name) for name, p in module.named_parameters()})
        blocks = select_blocks(module, self.wrap)
        if self.activation_checkpointing:
            if not blocks:
                raise UsageError(f"activation_checkpointing applies to the wrapped blocks, but wrap={self.wrap!r} "
                                 f"picks none in {type(module).__name__}.", "name the block class: wrap=Block.")
            # The composable API keeps parameter names (checkpoint_wrapper would add a prefix).
            from torch.distributed._composable import checkpoint

            for block in blocks:
                checkpoint(block)
        for block in blocks:
            fully_shard(block, **self._shard_kwargs(root=False))
        fully_shard(module, **self._shard_kwargs(root=True))
        self.blocks = len(blocks)
        return module

    def _sync_from_rank0(self, module: torch.nn.Module) -> None:
        """Every rank takes rank 0's parameters and buffers before sharding (as DDP does when it
        wraps): each rank's shard is cut from its own full copy, so a script that loads pretrained
        weights on rank 0 alone, or seeds ranks apart, would otherwise train a mix of starts."""
        if self.world_size == 1:
            return
        import torch.distributed as dist
        from torch.distributed.utils import _sync_module_states  # what DDP's constructor calls

        _sync_module_states(module, dist.group.WORLD, 250 * 1024 * 1024, 0, set())

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Point an optimizer built before sharding at the sharded parameters (FSDP2 needs the
        optimizer over the DTensor parameters; it would otherwise step tensors nobody uses).
        :meth:`check_optimizer` has refused one with state already."""
        for group in optimizer.param_groups:
            group["params"] = [self._sharded_param(p) for p in group["params"]]
        return optimizer

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer with state (from steps before setup): it cannot follow the parameters."""
        if any(optimizer.state.values()):
            raise UsageError("the optimizer has state from steps taken before engine.setup; fsdp cannot move it "
                             "onto the sharded parameters.", "call engine.setup(model, optimizer) before training.")

    def _sharded_param(self, param: torch.nn.Parameter) -> torch.nn.Parameter:
        owner = self._replaced.get(id(param))
        if owner is None:
            return param  # not a parameter of a sharded module (already sharded, or extra)
        module, name = owner
        return module.get_parameter(name)

    def no_backward_sync(self, module: torch.nn.Module) -> ContextManager[Any]:
        return _gradient_sync_off(module)

    # ----- in-place recovery: the shards put together again at another world size -------
    recovers_in_place = True  # a lost node's shards are rebuilt from a peer's (Engine._agree_shards)

    @property
    def replicates_shards(self) -> bool:
        """Hybrid sharding: every shard group holds a whole replica, so a lost node's shards are
        on another group already; full sharding (one shard per rank) copies each rank's shards to
        the next node instead (engine/replicas.py)."""
        return len(self.mesh_shape) == 2

    def new_mesh(self) -> None:
        """The mesh of the current default group (in-place recovery, before the survivors agree the
        step: a 2-D mesh makes its groups with every rank, and a joining rank made its own in
        ``setup``, before the same agreement; :meth:`reshard_in_place` then shards on it)."""
        self._mesh = None
        self.mesh_shape = mesh_shape(self.world_size, self.sharding, self.shard_size, self.env.local_world_size)
        _ = self.device_mesh

    def reshard_in_place(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         model_state: dict[str, torch.Tensor], optimizer_state: dict[str, dict[str, Any]]) -> None:
        """Shard ``module`` again over the current default group, in this process, from whole
        tensors (:func:`whole_state`): FSDP's wrapping is taken off the same module objects (the
        script's ``model`` and ``optimizer`` stay the objects it holds), the whole parameters put
        back, every block sharded on the current group's mesh (:meth:`new_mesh`), and the optimizer
        pointed at the new shards with its state cut from ``optimizer_state`` as FSDP cuts the
        parameters."""
        before = {id(fp.sharded_param): fqn for fqn, fp in fsdp_params(module)}
        strip_fsdp(module)
        tied: dict[int, list[tuple[torch.nn.Module, str]]] = collections.defaultdict(list)
        for fqn, param in module.named_parameters(remove_duplicate=False):
            path, _, name = fqn.rpartition(".")
            tied[id(param)].append((module.get_submodule(path), name))
        for fqn, value in model_state.items():
            path, _, name = fqn.rpartition(".")
            owner = module.get_submodule(path)
            old = owner._parameters[name]
            fresh = torch.nn.Parameter(value.to(self.root_device, copy=True), requires_grad=old.requires_grad)
            for where, attr in tied[id(old)]:  # a tied parameter stays one parameter
                where._parameters[attr] = fresh
        self._replaced = {}
        if self._mesh is None:
            self.new_mesh()
        from torch.distributed.fsdp import fully_shard

        for block in select_blocks(module, self.wrap):
            fully_shard(block, **self._shard_kwargs(root=False))
        fully_shard(module, **self._shard_kwargs(root=True))
        now = {fqn: fp.sharded_param for fqn, fp in fsdp_params(module)}
        for group in optimizer.param_groups:
            group["params"] = [now[before[id(p)]] if id(p) in before else p for p in group["params"]]
        optimizer.state = collections.defaultdict(dict)
        for fqn, state in optimizer_state.items():
            param = now[fqn]
            optimizer.state[param] = {key: self._shard_like(param, value) for key, value in state.items()}

    def _shard_like(self, param: Any, value: Any) -> Any:
        """This rank's shard of a whole optimizer tensor shaped like ``param`` (Adam's moments,
        momentum), as FSDP cuts ``param``: ``torch.chunk`` over the mesh's shard dimension; other
        values as they are."""
        if not isinstance(value, torch.Tensor):
            return value
        if value.dim() == 0 or tuple(value.shape) != tuple(param.shape):
            return value.to(self.root_device, copy=True)
        from torch.distributed.tensor import DTensor

        mesh = param.device_mesh
        dim = next(i for i, placement in enumerate(param.placements) if placement.is_shard())  # hybrid: 1 of 2
        size, rank = mesh.size(dim), mesh.get_local_rank(dim)
        pieces = list(torch.chunk(value, size, dim=0))
        pieces += [value[:0]] * (size - len(pieces))
        local = pieces[rank].to(self.root_device, copy=True)
        if local.shape != param._local_tensor.shape:
            raise RuntimeError(f"in-place recovery: an optimizer state of shape {tuple(value.shape)} cut into "
                               f"{tuple(local.shape)}, but its parameter's shard is {tuple(param._local_tensor.shape)}")
        return DTensor.from_local(local, mesh, param.placements, run_check=False, shape=param.shape,
                                  stride=param.stride())

    def _teardown(self, failed: bool = False) -> None:
        self._mesh, self._replaced = None, {}
        super()._teardown(failed)

    # ----- checkpoint state: full on rank 0 for files, sharded for DCP -----------------
    def full_model_state(self, module: torch.nn.Module) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def full_optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(module, optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {**state, "keyed_by": "name"} if state else {}

    def load_full_model_state(self, module: torch.nn.Module, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # set_model_state_dict replaces the values of the dict it is given: hand it a copy.
        set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))

    def load_full_optimizer_state(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                                  saved: dict[str, Any], path: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if saved.get("keyed_by") != "name":
            raise UsageError(f"optimizer state in {path!r} is keyed by position; fsdp needs it keyed by name.",
                             "load the model only (optimizer=None), or re-save it with trainfleet.")
        check_optimizer_names(optimizer, module, saved, path)
        state = {"state": {k: dict(v) for k, v in saved["state"].items()},
                 "param_groups": [dict(g) for g in saved["param_groups"]]}
        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def fsdp_params(root: torch.nn.Module) -> list[tuple[str, Any]]:
    """(name from ``root``, FSDP's record of the parameter) of every parameter FSDP2 manages."""
    from torch.distributed.fsdp import FSDPModule

    paths = {module: name for name, module in root.named_modules()}
    found = []
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else []:
            info = fsdp_param._module_info
            prefix = paths[info.module]
            found.append((f"{prefix}.{info.param_name}" if prefix else info.param_name, fsdp_param))
    return found


def shard_pieces(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], set[str]]:
    """This rank's part of the sharded state, by name: ``model/<param>`` (its shard of each
    parameter) and ``optim/<param>/<key>`` (its optimizer state: shards of the moments, whole
    step counters), as views of the live tensors; and the names that are shards (dim 0)."""
    from torch.distributed.tensor import DTensor

    pieces: dict[str, Any] = {}
    sharded: set[str] = set()
    for fqn, fsdp_param in fsdp_params(root):
        param = fsdp_param.sharded_param
        pieces[f"model/{fqn}"] = param._local_tensor.detach()
        sharded.add(f"model/{fqn}")
        for key, value in optimizer.state.get(param, {}).items():
            name = f"optim/{fqn}/{key}"
            if isinstance(value, DTensor):
                pieces[name] = value._local_tensor.detach()
                sharded.add(name)
            else:
                pieces[name] = value.detach() if isinstance(value, torch.Tensor) else value
    return pieces, sharded


def whole_state(by_rank: list[dict[str, Any]], sharded: set[str]) -> tuple[dict[str, Any], dict[str, dict]]:
    """The whole model and optimizer state (by parameter name) from every old rank's pieces, in
    rank order: the shards put end to end, the rest taken from rank 0's."""
    model: dict[str, Any] = {}
    optim: dict[str, dict] = collections.defaultdict(dict)
    for name in by_rank[0]:
        values = [pieces[name] for pieces in by_rank]
        value = torch.cat(values, dim=0) if name in sharded else values[0]
        kind, rest = name.split("/", 1)
        if kind == "model":
            model[rest] = value
        else:
            fqn, key = rest.rsplit("/", 1)
            optim[fqn][key] = value
    return model, dict(optim)


def strip_fsdp(root: torch.nn.Module) -> None:
    """Take FSDP2 off ``root`` and its blocks, in place: its hooks, its state and the class it
    swapped in (FSDP2 has no public way back; torch 2.13's own records, checked by the in-place
    tests). The parameters are left as they are: the caller puts whole ones back."""
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule

    contract = sys.modules["torch.distributed._composable.contract"]
    for module in root.modules():
        if isinstance(module, FSDPModule):
            state = module._get_fsdp_state()
            handles = {id(h): h for h in (state._pre_forward_hook_handle, state._post_forward_hook_handle) if h}
            for handle in handles.values():
                handle.remove()
            _module_state_mapping.pop(module, None)
            states = module.__dict__.get(contract.STATE_KEY, {})
            for func in [f for f in states if getattr(f, "__name__", "") == "fully_shard"]:
                del states[func]
            module.__dict__.get(contract.REGISTRY_KEY, {}).pop("fully_shard", None)
            module.__class__ = next(c for c in type(module).__mro__[1:] if not issubclass(c, FSDPModule))
        for mark in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            module.__dict__.pop(mark, None)


@contextlib.contextmanager
def _gradient_sync_off(module: torch.nn.Module) -> Iterator[None]:
    """No reduce-scatter (and, under hybrid, no all-reduce) of gradients inside: accumulation."""
    set_sync = getattr(module, "set_requires_gradient_sync", None)
    if set_sync is None:
        yield
        return
    set_sync(False)
    try:
        yield
    finally:
        set_sync(True)
