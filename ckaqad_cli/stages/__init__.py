"""Stage logic, one module per stage (diagnose, distill, pack, push): a config dataclass and a function usable from
Python; the CLI commands in ``ckaqad_cli.cli`` only turn options into that config."""
