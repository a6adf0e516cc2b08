"""The audio stage: claim pending calls, download, validate, convert and store their audio.

  claims.py       which calls are due, the claim and its leases, attempts, worker deaths
  preparation.py  preparing one claimed call: download, convert, store, record the outcome
  jobs.py         the Celery tasks below (imported here, so that workers.app's `include`
                  of "tasks.audio" registers them)
  startup.py      the audio store's start-up check (workers/audio/store/check.py)

Two tasks on the `audio` queue:

  tasks.audio.process_pending_audio   the periodic job (every AUDIO_WORKER_INTERVAL_SEC, and at
        once when ingest stores new calls). A singleton, but it only *claims*: in one committed
        transaction it takes up to AUDIO_WORKER_BATCH_SIZE due calls (FOR UPDATE SKIP LOCKED),
        gives them a lease (owner, until) and sends them out as a few prepare_calls tasks. It
        returns in milliseconds, so it never holds a pool process the downloads need.

  tasks.audio.prepare_calls(call_ids, owner, more)   a handful of claimed calls, on whichever
        audio pool process is free (late acks, prefetch 1: an idle process on any host takes
        the next one, so two workers download about twice as fast as one). A task holds up to
        twice AUDIO_DOWNLOAD_CONCURRENCY calls and downloads that many at once; each call is
        validated and converted in an executor as soon as it has arrived (while the next ones
        download), stored, and marked ready or failed. While it works, the task renews the
        leases; it writes an outcome only while it still holds the lease (checked under a row
        lock), so a call whose worker was presumed dead and which was claimed again is never
        written twice. A call already ready is skipped, so a redelivered task does no harm.

Backlog: no more than AUDIO_MAX_IN_FLIGHT calls are leased at once; the rest wait in PostgreSQL.
A pass that claimed all it was allowed marks its first task `more`, which asks for the next
pass as it starts: the next batch is queued while this one is worked on. A pass that finds the
cap reached leaves a note in Redis, and the next task to finish (having made room) asks for a
pass. So a backlog is worked off at the pool's pace, not the tick's.

Failures: each attempt's reason is recorded (error_code, last_error). Policy refusals (scheme,
host, address, size) fail at once; anything else is retried with exponential backoff until
AUDIO_MAX_ATTEMPTS. A worker that dies mid-call leaves its lease to run out; the call is then
claimed again (that counts as an attempt, so a call that kills its worker every time stops).
A pool process that dies (the OOM killer, a crash in a decoder) has its task put back at once,
under the same claim: each attempt is logged as its download starts, naming the process, and
the task's next taker counts the death against the call the dead process was working on
(claims.HeldClaim.take_over says how), so such a call fails as `worker_lost` after
AUDIO_MAX_ATTEMPTS deaths too.
"""

from tasks.audio import jobs as jobs
from tasks.audio import startup as startup
