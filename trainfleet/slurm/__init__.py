"""SLURM: environment -> ranks, nodelist expansion, and (later) submitit executors.

Never imports torch or the engine: the launcher wires this to the rest.
"""
