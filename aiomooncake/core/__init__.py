"""The pure protocol core: messages, matching, the rendezvous state machine and chunk plans.

Nothing in this package performs I/O or imports torch or mooncake. Like h11, it consumes events
(frames received, calls from the adapter) and produces events (frames to send, completions), so it
can be unit-tested without sockets.
"""
