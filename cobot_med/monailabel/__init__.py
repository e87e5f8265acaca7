"""A MONAI Label app for interactive segmentation in 3D Slicer and OHIF (docs/monailabel.md).

Needs the ``monailabel`` extra (``pip install -e ".[monailabel]"``). The server loads the app from a data
folder of the user's (``python -m cobot_med.monailabel DIR`` writes its ``main.py``; ``folder``); the code is
here: ``app`` (the MONAILabelApp), ``infer_task``, ``train_task``,
``datastore``, ``clicks`` (the prompts Slicer and OHIF send), ``served`` (which adapter is served),
``versions`` (numbered adapter versions, the held-out split, judging, rollback),
``settings`` (the ``--conf`` keys) and ``project`` (every call into the rest of cobot-med).
"""
