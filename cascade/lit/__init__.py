"""Lightning glue: the module that trains one stage, its data module, callbacks, and the train command."""
