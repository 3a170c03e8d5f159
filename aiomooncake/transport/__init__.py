"""The asyncio transport: framed msgpack over a TCP socket, the handshake and heartbeats."""
