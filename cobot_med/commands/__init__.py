"""Sub-commands of ``cobot-med``; see :mod:`cobot_med.cli`."""
