"""Heinsen's routing algorithms (2019, 2022) and end-to-end credit assignment."""
from .credit import end_to_end_credit, record_credit, residual_credit
from .routing import DefinableVectorRouting, EfficientVectorRouting, GenerativeMatrixRouting, Routing

__all__ = ['EfficientVectorRouting', 'DefinableVectorRouting', 'GenerativeMatrixRouting', 'Routing',
           'record_credit', 'end_to_end_credit', 'residual_credit']
__version__ = '1.2.0'
