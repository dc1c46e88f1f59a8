"""echovlm: train a compact GPT that writes echocardiography reports from study embeddings."""
