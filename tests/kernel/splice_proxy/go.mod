module netaccel.test/splice_proxy

go 1.19
