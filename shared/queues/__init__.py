"""Redis: key names, the queue layer (streams, weight registry), the stream worker loop, an embedded server."""
