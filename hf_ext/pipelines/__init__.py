"""diffusers pieces: the DDLM pipeline and scheduler (imported only on use, so `import hf_ext` needs no diffusers)."""

from .pipeline_ddlm import DDLMPipeline, DDLMPipelineOutput
from .scheduling_ddlm import DDLMScheduler, DDLMSchedulerOutput

__all__ = ["DDLMPipeline", "DDLMPipelineOutput", "DDLMScheduler", "DDLMSchedulerOutput"]
