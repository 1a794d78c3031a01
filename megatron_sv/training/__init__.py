"""Training entry point: arguments, the train loop, logging and signal handling.

``megatron_sv.training.main(argv)`` runs pretrain_gpt_sv.py's command line."""


def main(argv=None) -> int:
    from megatron_sv.training.cli import main as _main  # noqa: PLC0415 - the package import stays light

    return _main(argv)


__all__ = ["main"]
