"""The tooling on top of the reference (``armor_ref``) and the fast implementation (``backends``): the ``armor-ref``
command line, the Hugging Face pipeline (``models``, ``compress``), evaluation and reports. It imports downwards
only; nothing below it imports it."""
