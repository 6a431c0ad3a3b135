"""What is measured against the synthetic cohort's known truth (the demo's): the results table with the
baseline each figure has to beat. The only library package that may read `data_prep.synthetic`.
"""
