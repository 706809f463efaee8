"""Building blocks of OFS-DPO and COFS-DPO (../methods/ofs-cofs.md): the chasing term, the role-swap rule, and the
exact combination of LoRA modules. The schedule that uses them is not built yet."""
