"""The controller's loops and what they call: the claim loop, the PV annotator, the expiry of
captures, the hot copy through the source's server (materializer), where a source is (locator)
and the gate of one backup per source instance."""
