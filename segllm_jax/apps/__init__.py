"""Front-ends: the ``segllm-jax`` command (:mod:`.cli`) and what its commands run: ``chat``, ``infer``,
``demo`` and the web demo (``serve``: :mod:`.web_demo` builds the UI, :mod:`.web_sessions` keeps the
per-tab sessions). They sit on top of the library (session, batch, eval, train); nothing below
imports them.
"""
