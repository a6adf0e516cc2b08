"""Retention: the `maintenance` job prunes each kind of history after its RETENTION_* setting.

Each run, in this order, until the work is done or its time budget is spent (the rest waits for
the next run; nothing depends on one run finishing):

  1. remove the files listed in audio_file_trash (left over by a run that stopped in between);
  2. fold the all-time counters (workers.core.counters.COUNTERS) forward to `now - FOLD_MARGIN`,
     so the metrics endpoint's counters do not drop when rows go;
  3. prune, oldest first, RETENTION_BATCH_SIZE rows per transaction with a pause in between:
     original files, prepared files, calls (when set), transcripts (when set), audio attempts,
     quarantine, the poll log, job runs;
  4. remove the files those batches listed.

The modules, one concept each:

  run    one run's state: settings, time budget, lock check, batch size and its report
  fold   folding the all-time counters into history_totals
  rows   what is pruned after which setting, one batch a transaction
  trash  removing the files pruned rows listed, after their commit
  jobs   the Celery entry point (`tasks.maintenance.prune_history`, name unchanged) and
         `run_maintenance`, one run callable on its own

Imported here so that the app's `include` registers the task.
"""

from tasks.maintenance import jobs

__all__ = ["jobs"]
