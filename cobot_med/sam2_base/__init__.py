"""SAM 2 as a base (issue 26): key-slice propagation by SAM 2's memory (:mod:`.propagation`)."""
