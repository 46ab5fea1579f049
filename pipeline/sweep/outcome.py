"""What a trial tells the sweep's driver about its point: one of these as its final `status`.

A point that diverged is recorded as FAILED in MLflow with a reason that starts with its outcome
(`diverged: loss is nan at step 12`), so a multi-worker trial reads the outcome back from the run.
"""


class Outcome:
    FINISHED = "finished"   # trained to its last step by this trial
    SKIPPED = "skipped"     # finished by another sweep meanwhile
    DIVERGED = "diverged"   # a property of the run (non-finite loss): recorded, not retried
    ERRORED = "errored"     # an exception: Tune retries it up to resources.max_failures
    FAILED = "failed"       # failed without a recorded reason

    @staticmethod
    def reason(outcome: str, detail: str) -> str:
        """The MLflow failure reason of a point that ended with `outcome`."""
        return f"{outcome}: {detail}"

    @staticmethod
    def of_reason(reason: str) -> str:
        """The outcome a failure reason starts with."""
        return reason.split(":")[0] or Outcome.FAILED
