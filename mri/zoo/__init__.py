"""The zoo: our own model organisms — corpus, synthetic world, tokenizer, training, planted problems."""
