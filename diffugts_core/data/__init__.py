"""The data the kit runs on: PhantomBench (``phantoms``), real datasets through manifests (``manifests``), and the
zero-shot settings with their seeds and splits (``splits``)."""
