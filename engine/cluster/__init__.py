"""Several GPUs through NATS JetStream: the bot keeps the queue, workers run the images.

    bot (python -m bot run)                         NATS JetStream              workers
    fair queue ─ a worker that fits is free ─▶ <NAME>_JOBS: <name>.jobs.<worker> ─▶ pull, lease
       ▲                                            <name>.progress.<id>  ◀──── each step
       │ outcome by job id (once)  ◀─────────────── <NAME>_RESULTS ◀────────── outcome, then ack
       │ PNGs                      ◀─────────────── <name>-images (objects) ◀─ PNGs
    room, capabilities             ◀─────────────── <name>-workers (KV, TTL) ◀─ heartbeat
    /cancel ─────────────────────▶ <name>.cancel.<id> ─────────────────────────▶ stops at a step
    a job tried max_deliver times: <NAME>_DEAD (the server's advisory) ─▶ the bot fails it

- A job is published once per worker (``<job id>.<worker>`` is the ``Nats-Msg-Id``) and only
  when a worker that can run it (pixels, batch, style) is free; the bot picks it (``claims.py``),
  so the fair order is the bot's and nothing waits in a worker's own queue.
- A worker holds a job for ``ack_wait_s``, renewed (``in_progress``) while it runs; a worker
  whose heartbeat expires mid-job loses it to the next worker that fits (same seed, same image
  on workers of one GPU kind and config: float8 matmuls differ slightly from bf16 ones).
- A worker stores the PNGs and the outcome before it acks the job, and the outcome stream keeps
  one message per job id: a bot that was away finds it on its return, and a job's outcome is
  taken once however often it arrives.
- The bot deletes a job's PNGs (and an image-to-image job's picture) from the images bucket
  once it has journalled the job (``leftovers.py``); outcomes are small and stay for
  ``result_ttl_s``, which also ends whatever a killed bot never came back for.
"""
