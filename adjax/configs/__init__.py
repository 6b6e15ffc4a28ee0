"""Configs: the paper's recipe (`default_config`), the pieces experiments share, the demo's,
and the loading of config files and `--config.key=value` overrides.

  default.py   default_config(): every field, with the paper's values
  shared.py    the paper's backbones, its recipe per backbone, the runlocal shrink
  demo.py      demo_config(): the embedded demo
  loading.py   config files (`FILE[:ARG]`) and command-line overrides
"""

from adjax.configs.default import default_config

__all__ = ["default_config"]
