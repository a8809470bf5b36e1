"""The product's commands. argparse lives here and nowhere else; each family of commands has its
own module (``launch``, ``doctor``, ``train``, ``ckpt``, ``bench``, ``jobs``, ``registries``), and
:mod:`trainfleet.cli.main` puts them under ``trainfleet``."""
