"""Generation: sampling, stop handling, and (later) the paged KV cache and the scheduler.
Knows the model's forward interface, never the server."""
