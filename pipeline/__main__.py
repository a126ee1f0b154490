"""``python -m pipeline [overrides]``: compose the config with Hydra and run it."""

import signal
import sys

import hydra

from pipeline.config import check_list_choices, check_override_keys, register_configs
from pipeline.errors import UserError

register_configs()

# The entry point imports the run and record rooms (torch, diffusers, mlflow: ~4 s) only once the command line has
# passed its checks, so a typo is answered in the time it takes to load the schema.


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg):
    from pipeline.run.runner import run_from_hydra

    return run_from_hydra(cfg)


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, cluster pre-emption) ends runs KILLED, like Ctrl-C


def _check_overrides(argv: list[str]) -> None:
    """Before Hydra runs (so before any run dir exists): ``mode=[metric]`` names the valid modes (Hydra says only
    "Could not load 'mode/metric'"), and a misspelled key (``sampler.num_inference_step=5``) names the right one
    (Hydra would suggest the ``+`` form, which the schema then refuses)."""
    from hydra._internal.utils import get_args_parser

    try:
        overrides = get_args_parser().parse_known_args(argv)[0].overrides
    except (SystemExit, Exception):  # noqa: BLE001 - Hydra reports its own command-line errors
        return
    try:
        check_list_choices(overrides)
        check_override_keys(overrides)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def cli() -> None:
    _check_overrides(sys.argv[1:])
    from pipeline.core.threads import configure_torch

    configure_torch()  # threads = the CPUs this process may use (a joblib sweep then splits them per job)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except KeyboardInterrupt:
        from pipeline.record.tracking import close_open_parents

        close_open_parents("KILLED")
        sys.exit(130)
    except SystemExit as e:
        if e.code not in (0, None):  # Hydra reports a composition error (e.g. an unknown option in a sweep list)
            from pipeline.record.tracking import close_open_parents

            close_open_parents("FAILED", "sweep stopped before its jobs finished: a configuration error (see the log)")
        raise
    from pipeline.run.runner import FAILED_JOBS

    if FAILED_JOBS:
        sys.exit(1)


if __name__ == "__main__":
    cli()
