"""Moving records from the request path to the store in the background.

* :mod:`.recorder` — the :class:`Recorder`: bounded queue, writer and spiller threads.
* :mod:`.backoff` — the retry schedule while the store is unreachable.
* :mod:`.spool` — the on-disk spool records wait in during an outage.
* :mod:`.spoolformat` — how a record is written in a spool row and read back.
* :mod:`.compact` — the form records take in the queue, which the garbage collector skips.
* :mod:`.metrics` — the recorder's OpenTelemetry instruments.
"""
