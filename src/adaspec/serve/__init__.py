"""OpenAI-compatible HTTP server: /v1/completions and /v1/chat/completions (JSON or SSE), /v1/models, /health,
/metrics (Prometheus text).

  intake.py    a request's way in: its body read within bounds, parsed, its method chosen, its prompt tokenised
  requests.py  request bodies: strict JSON validation, OpenAI parameters we lack refused by name
  policy.py    what a request may choose: methods (the registry's), and server-side option values (the options the
               registry marks so) only by operator-given names
  responses.py OpenAI's response bodies, whole or as server-sent events, with our `speculative` statistics
  text.py      token ids -> text deltas, stop strings, in time linear in the text
  runners.py   runners per configuration: built on their own thread, an LRU bounded by count and memory
  worker.py    the one generation thread, jobs, cancellation
  metrics.py   /metrics counters; every request counted once
  app.py       the routes and a request's bounded way through them
"""

from adaspec.serve.app import DrainingServer, ServerOptions, Service, create_app, make_server, run_in_thread
from adaspec.serve.errors import ApiError
from adaspec.serve.policy import RequestPolicy
from adaspec.serve.text import TextStream

__all__ = ["ApiError", "DrainingServer", "RequestPolicy", "ServerOptions", "Service", "TextStream", "create_app",
           "make_server", "run_in_thread"]
