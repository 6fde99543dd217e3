"""The request path of DESIGN.md, one module per stage:

- ``parse``: the body, validated at the boundary;
- ``prepare``: authenticate, resolve the model group (``route``), admit
  (``admit``: limits, budgets, quotas, credits) and look in the cache, in one
  trip to a worker thread;
- ``attempt``: the one attempt/fallback loop of plain and streamed calls;
- ``relay``: a stream, chunk by chunk;
- ``settle``: the one settlement of every call, however it ends;
- ``entry``: the entry points the views call.

Database and cache work runs in worker threads (gateway_project/threads.py),
bundled so that a call makes two hops; provider calls run on the event loop
and never inside a database transaction.
"""
