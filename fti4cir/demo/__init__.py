"""The small demo world: clothing photos shipped in the repository, their class words and colour labels, captions,
the held-out composed-retrieval benchmark `clothing-cir`, the small CLIP trained from scratch on them
(`clip_train`), and `rebuild`, which makes every learned file of the embedded demo from these."""
