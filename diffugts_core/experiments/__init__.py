"""Research code, apart from the product: the speed and window studies, the zero-shot benchmark, the regression gate
and the foundation model's check. The product (pipeline, stages, CLI segmenting) never imports from here."""
