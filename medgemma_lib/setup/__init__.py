"""Lessons 01-02: the environment report (`doctor`), Hugging Face access (`auth`) and the memory estimate
(`memory`)."""
