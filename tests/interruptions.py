"""A kill in the middle of a run, for tests of resuming: the pipeline's next call raises KeyboardInterrupt."""


def stop_pipeline_after(monkeypatch, calls: int) -> None:
    """The first `calls` pipeline calls run; the one after raises KeyboardInterrupt, as Ctrl-C or a kill
    would stop the run there."""
    from slideredit.pipelines import SliderEditFluxKontextPipeline

    made, original = [], SliderEditFluxKontextPipeline.__call__

    def call(self, *args, **kwargs):
        if len(made) == calls:
            raise KeyboardInterrupt
        made.append(1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(SliderEditFluxKontextPipeline, "__call__", call)
