"""BreastXAI core: data, preprocessing, models, training, evaluation and explainers.

Never imports streamlit; the dashboard calls into this package through a thin service layer.
"""
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow start-up chatter out of logs

__version__ = "0.1.0"
