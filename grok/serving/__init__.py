"""Generation: jitted steps of one model (`runner`), the continuous-batching engine (`engine`),
per-row sampling (`sampling`), the tokenizer and the streaming detokenizer."""
