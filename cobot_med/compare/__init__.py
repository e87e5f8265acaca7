"""Compare finished training runs across methods, seeds and datasets, as the papers' Table 4 does.

Three steps, each callable on its own:

- :func:`load_runs` reads every run of the chosen experiments from any MLflow tracking store
  (a local SQLite file, a PostgreSQL database, an ``http://`` tracking server) into one
  :class:`pandas.DataFrame`, one row per run, with its ``state`` and, when it cannot enter the
  comparison, the ``reason``;
- :func:`summarize` keeps the finished runs (the latest one per dataset, method, arch, input size
  and seed), averages them over seeds and puts the paper's own figures beside them;
- :func:`write_report` writes the tables as Markdown and CSV and draws two pictures.

The run names it reads (params ``dataset``, ``peft``, ``image_encoder_trainable``, ...; metrics
``test_dsc``, ``test_dsc_<organ>``; tag ``cobot_med.status``) are the training contract of
``docs/CONTRACTS.md``, documented for users in ``docs/compare.md``: a run logged by any other tool
under those names joins the table.
"""

from .report import format_dsc, format_markdown, format_params_k, write_report
from .runs import load_runs, paper_results, resolve_tracking_uri
from .summary import Summary, summarize
from .plots import plot_dsc_vs_params, plot_organ_dsc, plot_protocol_dsc

__all__ = ["Summary", "format_dsc", "format_markdown", "format_params_k", "load_runs", "paper_results",
           "plot_dsc_vs_params", "plot_organ_dsc", "plot_protocol_dsc", "resolve_tracking_uri", "summarize", "write_report"]
