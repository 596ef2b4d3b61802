"""tsdkd: Token-Selective Dual Knowledge Distillation, offline and two-stage.

This package holds what both stages share: the teacher-signal format, the configs, the CLI.
"""

__version__ = "0.1.0"
