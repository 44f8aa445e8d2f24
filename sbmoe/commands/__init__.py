"""The sub-commands of ``sbmoe``: each module parses its flags (``build_parser``) and delegates (``main``)."""
