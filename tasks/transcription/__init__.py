"""Transcription: dispatch prepared calls to the transcription pool and transcribe them.

A call becomes transcribable when its audio becomes ready: a trigger on call_audio gives it a
`call_transcription` row (sql/004_transcription.sql), the dispatcher's work queue. The stage's
modules, one concept each:

  dispatch  how ready calls are picked, leased and sent to the queue, with backpressure
  claims    a `call_transcription` row under a worker's claim: taking (or taking over) the
            call, and ending the claim as done, failed or released for a retry
  policy    what a failed attempt leads to: a retry after a backoff, or failed for good
  jobs      the Celery entry points (`tasks.transcription.dispatch_ready_calls`,
            `tasks.transcription.transcribe_call`): names unchanged, since deployed schedules
            and queued messages name them
  startup   the worker start-up check of the recogniser (a Celery signal)

Whether a claimant process is still alive is decided once for every stage, by
`workers.core.identity.process_is_gone`. Imported here so that the app's `include` registers the
tasks and connects the signal.
"""

from tasks.transcription import jobs, startup

__all__ = ["jobs", "startup"]
