"""Services: methods called by name over the unary calls (docs/services.rst).

Modules, one job each:

=============  ==============================================================================
``_errors``    the errors of a method call, their codes, the registry of remote errors
``_envelope``  the service envelope inside a message body: a call and its reply (sans-IO)
``_codecs``    how arguments, results and error details are encoded: JSON, MessagePack
``_router``    :class:`Router`: methods by name, the handler that serves them, middleware
``_caller``    the calling side: ``call``, ``notify``, ``proxy``, metadata, client middleware
``_retry``     :func:`retry` and the backoff with full jitter the client pool dials with
=============  ==============================================================================
"""
