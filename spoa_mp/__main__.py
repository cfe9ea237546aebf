from spoa_mp.entry import main

if __name__ == "__main__":
    raise SystemExit(main())
