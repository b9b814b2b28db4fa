"""The small demo world: clothing photos shipped in the repository, their class words and colour labels, captions,
and the held-out composed-retrieval benchmark `clothing-cir` built from them."""
