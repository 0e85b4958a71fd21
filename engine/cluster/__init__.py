"""Several GPUs through NATS JetStream: the bot keeps the queue, workers run the images.

    bot (python -m bot run)                         NATS JetStream              workers
    fair queue ─ a worker has room ─▶ publish ───▶ <NAME>_JOBS (work queue) ──▶ pull, lease
       ▲                                            <name>.progress.<id>  ◀──── each step
       │ outcome by job id (once)  ◀─────────────── <NAME>_RESULTS ◀────────── outcome, then ack
       │ PNGs                      ◀─────────────── <name>-images (objects) ◀─ PNGs
    room = live workers            ◀─────────────── <name>-workers (KV, TTL) ◀─ heartbeat
    /cancel ─────────────────────▶ <name>.cancel.<id> ─────────────────────────▶ stops at a step
    a job tried max_deliver times: <NAME>_DEAD (the server's advisory) ─▶ the bot fails it

- A job is published once (its id is the ``Nats-Msg-Id``) and only when a worker has room, so
  the fair order is the bot's; nothing waits in a worker's own queue.
- A worker holds a job for ``ack_wait_s``, renewed (``in_progress``) while it runs; a worker
  that dies lets it lapse and the server gives the job to another (same seed, same image).
- A worker stores the PNGs and the outcome before it acks the job, and the outcome stream keeps
  one message per job id: a bot that was away finds it on its return, and a job's outcome is
  taken once however often it arrives.
"""
