"""The project's own demo data (procedural captioned clips, :mod:`wanrt.demo.data`) and the model-independent
prompt-adherence score (:mod:`wanrt.demo.adherence`), for the tiny trained model and the quality gate."""
