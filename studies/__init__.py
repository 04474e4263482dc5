"""
Side studies beside the papers' replication, each run by hand (`python -m studies.<name>`) and writing its report:
glom (GLOM and the two models it is compared with), glom_digits (the comparison on real digits) and digits_vit (a
small ViT pretrained on the digits, the committed pretrained/digits_vit/, and its routing head's credit).
"""
