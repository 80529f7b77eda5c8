"""Commands for developers, outside the library's import graph: `python -m grok.tools.bench`
(throughput and step times against a roofline) and `python -m grok.tools.train_demo` (retrains
the demo model). Nothing in grok imports this package."""
