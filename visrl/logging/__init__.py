"""Run logging for visrl: the RunLogger (metrics.jsonl mirror + W&B / CSV backends), the Lightning adapter,
run plots, sweep markers, and the readers behind the analysis notebook and ``python -m visrl.report``.

Importing this package is cheap: W&B, matplotlib and Lightning are imported by the submodules that need them
(``backends``, ``plots``/``sweep_plots``, ``lightning``).
"""

from visrl.logging.media import ImageWithBoxes
from visrl.logging.run_logger import RunLogger, read_metrics

__all__ = ["ImageWithBoxes", "RunLogger", "read_metrics"]
