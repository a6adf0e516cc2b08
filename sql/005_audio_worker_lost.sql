-- An audio attempt can end because its worker process died under it (the OOM killer, a crash
-- in a decoder): the worker puts the task back at once, and the process that takes the task
-- over closes the dead attempt as 'worker_lost' (tasks/audio.py, take_over). Before, such an
-- attempt's outcome stayed NULL for ever.
ALTER TABLE call_audio_attempts DROP CONSTRAINT call_audio_attempts_outcome_check;
ALTER TABLE call_audio_attempts ADD CONSTRAINT call_audio_attempts_outcome_check
    CHECK (outcome IN ('ready', 'retry', 'failed', 'lease_lost', 'worker_lost'));
