// placeholder: kernels land here.
