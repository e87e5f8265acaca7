"""Exported models and the runtimes built for them (docs/export.md).

- :mod:`.manifest`: an exported folder's manifest and its checks (no model, no runtime imported);
- :mod:`.runtime`: :class:`~.runtime.ExportedSam`, an exported model on ONNX Runtime or OpenVINO behind
  PromptableSam's call signature, the network :class:`cobot_med.predict.SlicePredictor` runs;
- :mod:`.backend`: ``backend`` = ``torch`` / ``onnxruntime`` / ``openvino`` / ``auto`` for a run, the cache of bases
  exported on first use, the measured choice of ``auto``;
- :mod:`.exporter` and :mod:`.graphs` (need the training stack): the export itself;
- :mod:`.quantize`: the explicit int8 option (ONNX Runtime static quantisation on the run's own slices).
"""
