"""The command lines of tools/ and examples/: argparse + ``main(argv) -> exit code`` over the library
modules (prep/, mixing/, convert/, evaluation, experiments/). ``tools/<name>.py`` runs
``megatron_dga.cli.<name>.main``; being modules, the experiment runner and the tests call them
in-process with the arguments a user types."""
