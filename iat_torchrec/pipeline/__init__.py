"""The whole pipeline as TorchX stages: a plan of steps (:mod:`.plan`), a runner that launches
them through TorchX and skips what is already made (:mod:`.runner`), and the evaluation stage
that turns the downstream runs into the comparison table (:mod:`.report`)."""
